"""The English -> Spanish translation task in one package (``attnlab data translation``, ``attnlab train --task
translation``, ``attnlab translate``):

- ``sword.py``: fetching the two Bible texts (Debian's SWORD packages) and reading their raw verses;
- ``data.py``: cleaning, verse alignment, the split by book, the BPE tokenizer and the dataset folder;
- ``task.py``: training (``TranslationTask``, ``build_translation_run``), decoding (``decode``, ``translate``)
  and scoring (``evaluate``: BLEU and chrF).

The batching and loss of every seq2seq task (``Seq2SeqTask``, ``collate``, the special ids) are shared with the
built-in numbers tasks in ``tasks/seq2seq_data.py``. Nothing is imported here, so ``attnlab data translation``
does not load the model code: import the module you need.
"""

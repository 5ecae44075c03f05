"""A run's data readers: texts, instruction chats, preference pairs, and jlora's own data sets.

- :mod:`~jlora.runner.data.text`: named texts and resumable windows of tokens.
- :mod:`~jlora.runner.data.chats`: JSONL chat records, their tokens and loss masks, packed rows.
- :mod:`~jlora.runner.data.chat_batches`: a run's chats validated up front, batches by position.
- :mod:`~jlora.runner.data.preferences`: JSONL preference pairs (TRL's formats), ``[2B, T]``
  batches by position.
- :mod:`~jlora.runner.data.stdlib_text`, :mod:`~jlora.runner.data.stdlib_modules`,
  :mod:`~jlora.runner.data.stdlib_preferences`: data sets built from Python's standard library
  (labelled docstrings; which module defines a function, as instructions and as pairs).
"""

"""A run's data readers: text sources, instruction chats, and the data sets jlora builds itself.

- :mod:`~jlora.runner.data.text`: named texts and resumable windows of tokens.
- :mod:`~jlora.runner.data.chats`: JSONL chat records, their tokens and loss masks, packed rows.
- :mod:`~jlora.runner.data.chat_batches`: a run's chats validated up front, batches by position.
- :mod:`~jlora.runner.data.stdlib_text`, :mod:`~jlora.runner.data.stdlib_modules`: data sets
  built from Python's standard library (labelled docstrings; which module defines a function).
"""

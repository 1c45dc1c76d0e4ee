"""Errors raised by data sources, naming the shard and record at fault."""


class DataError(ValueError):
  """A record that cannot be decoded or has the wrong shape.

  The message names where it came from (`shard.array_record[17]`, a file
  path, `tfds:name/split[3]`) and what was wrong.
  """

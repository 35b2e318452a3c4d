"""The one exception type of the data layer."""


class DataError(ValueError):
  """Bad or missing data: a missing path, an empty corpus, undecodable bytes, a bad hash, ...

  The message names the offending path, field or value and what was expected.
  """

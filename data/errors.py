"""The one exception the data package raises for problems with a user's data."""


class DatasetError(ValueError):
    """A dataset cannot be used; the message says what is wrong and where."""

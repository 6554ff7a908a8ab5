"""The one error the input pipelines raise (image-text in pipeline.py, text in text.py)."""


class DataError(RuntimeError):
    """The data cannot feed the run: too many unusable examples, or an empty source."""

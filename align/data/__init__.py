"""Datasets in TRL's formats (plus scored groups): loading, validation, tokenization, batching."""

from align.data.collate import GroupCollator, LengthGroupedSampler, concat_rows, padded_length
from align.data.errors import DataError
from align.data.examples import DataStats, ExampleDataset, build_dataset
from align.data.loading import load_records

__all__ = ["DataError", "DataStats", "ExampleDataset", "GroupCollator", "LengthGroupedSampler", "build_dataset",
           "concat_rows", "load_records", "padded_length"]

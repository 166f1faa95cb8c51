"""Datasets in TRL's formats (plus scored groups): loading, validation, tokenization, batching."""

from align.data.collate import GroupCollator, LengthGroupedSampler, concat_rows, padded_length
from align.errors import DataError
from align.data.examples import DataStats, ExampleDataset, build_dataset, detect_kind, prompt_token_ids
from align.data.loading import load_records, read_prompts

__all__ = ["DataError", "DataStats", "ExampleDataset", "GroupCollator", "LengthGroupedSampler", "build_dataset", "detect_kind",
           "concat_rows", "load_records", "padded_length", "prompt_token_ids", "read_prompts"]

"""Training data: chat templates (:mod:`.templates`), LLaVA records and their validation
(:mod:`.records`), and the dataset, collate function and length-grouped sampler (:mod:`.dataset`).

>>> from hires_lmm.data import get_template, load_records, validate, LlavaDataset
"""

from .dataset import LengthGroupedSampler, LlavaDataset, collate, split_to_even_chunks
from .records import (
    DataError,
    DataFileNotFoundError,
    Problem,
    Record,
    RecordError,
    ValidationReport,
    VisualTokenCounter,
    check_image,
    check_record,
    load_records,
    make_record,
    parse_sampling,
    resolve_image,
    sample_indices,
    validate,
)
from .templates import (
    IGNORE_INDEX,
    TEMPLATES,
    ChatTemplate,
    Encoding,
    MissingSpecialTokenError,
    Segment,
    TemplateError,
    TokenizationMismatchError,
    check_alignment,
    encode_segments,
    get_template,
    tokenizer_adds_bos,
)

__all__ = ["ChatTemplate", "DataError", "DataFileNotFoundError", "Encoding", "IGNORE_INDEX", "LengthGroupedSampler",
           "LlavaDataset", "MissingSpecialTokenError", "Problem", "Record", "RecordError", "Segment", "TEMPLATES",
           "TemplateError", "TokenizationMismatchError", "ValidationReport", "VisualTokenCounter", "check_alignment",
           "check_image", "check_record", "collate", "encode_segments", "get_template", "load_records", "make_record",
           "parse_sampling", "resolve_image", "sample_indices", "split_to_even_chunks", "tokenizer_adds_bos",
           "validate"]

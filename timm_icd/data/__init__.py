from .augment import AUGMENT_FLAGS, AugmentConfig, BatchAugment
from .decode import DECODE_SCALES, ReducedDecodeCrop, decode_factor, device_decode_reason
from .pipeline import PIPELINES, InputStage, Pipeline, PipelineConfig, batch_seed, create_pipeline, seeded_rng
from .shards import META_FILE, write_shards
from .sources import (
    HOLDOUT, ImageClassificationDataset, ImageData, digits_dataset, find_bad_images, load_dataset_dict, load_image_data)
from .streaming import StreamLoader, load_stream_data

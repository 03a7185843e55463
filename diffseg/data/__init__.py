"""diffseg.data: phantoms, Zenodo downloads, preprocessing, splits, loading and augmentation.

Public API::

    prepare_dataset(name, ds_cfg, out_dir, resources_dir, threads=1) -> dict  # dataset.json
    load_dataset(data_dir) -> Dataset                                 # .info, .split(name), ...
    preprocess_scan(image, info) -> (volume, grid)                    # a new scan, as a run's data
    reference_prostate_split(institution_txt) -> {uid: split}         # the paper's 411/14/164
    reference_amos_split(dataset_json) -> {uid: split}                # the paper's 200/10/90
    augment_batch(key, images, labels, cfg) -> (images, labels)       # pure JAX, jit-able
    generate_phantom(anatomy, shape, spacing, seed, index) -> (image, label)
    download_dataset(name, ds_cfg, resources_dir, base_url=None) -> dict  # manifest.json
"""

from diffseg.data.dataset import Dataset, augment_batch, load_dataset
from diffseg.data.download import download_dataset, download_file, fetch_record, md5sum
from diffseg.data.phantom import CLASSES, generate_phantom
from diffseg.data.prepare import prepare_dataset
from diffseg.data.preprocess import (
    Preprocessed,
    PreprocessOptions,
    crop_or_pad,
    normalize_intensity,
    preprocess_case,
    preprocess_scan,
    resample,
)
from diffseg.data.sources import Case, Source, list_source
from diffseg.data.splits import (
    make_split,
    random_split,
    read_split_csv,
    reference_amos_split,
    reference_prostate_split,
    write_split_csv,
)

__all__ = [
    "CLASSES",
    "Case",
    "Dataset",
    "PreprocessOptions",
    "Preprocessed",
    "Source",
    "augment_batch",
    "crop_or_pad",
    "download_dataset",
    "download_file",
    "fetch_record",
    "generate_phantom",
    "list_source",
    "load_dataset",
    "make_split",
    "md5sum",
    "normalize_intensity",
    "prepare_dataset",
    "preprocess_case",
    "preprocess_scan",
    "random_split",
    "read_split_csv",
    "reference_amos_split",
    "reference_prostate_split",
    "resample",
    "write_split_csv",
]

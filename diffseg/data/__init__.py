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

Names are imported on first use: the workflow's rules and ``diffseg status`` read this package's
light modules (``prepare.source_files``) without loading jax, which ``dataset`` and ``augment`` need.
"""

from diffseg.lazy import exports

_WHERE = {
    "Dataset": "dataset",
    "augment_batch": "dataset",
    "load_dataset": "dataset",
    "download_dataset": "download",
    "download_file": "download",
    "fetch_record": "download",
    "md5sum": "download",
    "CLASSES": "phantom",
    "generate_phantom": "phantom",
    "prepare_dataset": "prepare",
    "Preprocessed": "preprocess",
    "PreprocessOptions": "preprocess",
    "crop_or_pad": "preprocess",
    "normalize_intensity": "preprocess",
    "preprocess_case": "preprocess",
    "preprocess_scan": "preprocess",
    "resample": "preprocess",
    "Case": "sources",
    "Source": "sources",
    "list_source": "sources",
    "make_split": "splits",
    "random_split": "splits",
    "read_split_csv": "splits",
    "reference_amos_split": "splits",
    "reference_prostate_split": "splits",
    "write_split_csv": "splits",
}

__getattr__, __all__ = exports(__name__, _WHERE)

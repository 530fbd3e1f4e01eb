"""Datasets: readers, LightningDataModules, and the one module (convert) that maps value ranges."""

from genlab.data.convert import save_grid, to_model, to_uint8, to_unit
from genlab.data.datamodules import (
    CelebADataModule,
    CIFAR10DataModule,
    FashionMNISTDataModule,
    FolderDataModule,
    ImageDataModule,
    MNISTDataModule,
    SyntheticDataModule,
)
from genlab.data.readers import CorruptImageWarning, DatasetNotFoundError

__all__ = [
    "ImageDataModule",
    "MNISTDataModule",
    "FashionMNISTDataModule",
    "CIFAR10DataModule",
    "CelebADataModule",
    "FolderDataModule",
    "SyntheticDataModule",
    "DatasetNotFoundError",
    "CorruptImageWarning",
    "to_model",
    "to_uint8",
    "to_unit",
    "save_grid",
]

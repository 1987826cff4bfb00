"""Federated datamodules: a dataset in memory plus its partition over clients."""

from fedbat.datamodules.datasets import READERS, Splits, load
from fedbat.datamodules.federated import FederatedDataModule
from fedbat.datamodules.partition import PARTITIONERS, partition

__all__ = ["PARTITIONERS", "READERS", "FederatedDataModule", "Splits", "load", "partition"]

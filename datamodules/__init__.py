"""Federated datamodules: a dataset in memory plus its partition over clients."""

from datamodules.datasets import READERS, Splits, load
from datamodules.federated import FederatedDataModule
from datamodules.partition import PARTITIONERS, partition

__all__ = ["PARTITIONERS", "READERS", "FederatedDataModule", "Splits", "load", "partition"]

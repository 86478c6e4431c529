"""Test-wide settings: the models under test are tiny, so one intra-op thread is fastest and
keeps parallel test runs from oversubscribing the cores."""
import torch

torch.set_num_threads(1)

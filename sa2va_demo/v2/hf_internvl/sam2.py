"""A tiny SAM2 (remote code). Its memory-encoder layer scale is ``g_weight``, as in Sa2VA's HF code:
transformers renames keys containing ``gamma`` on load."""
import torch
from torch import nn


class LayerScale(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.g_weight = nn.Parameter(torch.full((dim,), 0.5))


class Fuser(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.layers = nn.ModuleList([LayerScale(dim)])


class MemoryEncoder(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.fuser = Fuser(dim)


class Sam2Model(nn.Module):
    def __init__(self, dim=16, patch=4):
        super().__init__()
        self.image_encoder = nn.Conv2d(3, dim, patch, patch)
        self.memory_encoder = MemoryEncoder(dim)
        self.sam_mask_decoder = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim))


class SAM2(nn.Module):
    def __init__(self, dim=16, patch=4):
        super().__init__()
        self.sam2_model = Sam2Model(dim, patch)


def text_hidden_fcs(in_dim, out_dim=16):
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(inplace=True), nn.Linear(in_dim, out_dim), nn.Dropout(0.0))

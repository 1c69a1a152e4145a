"""The paper's two-GPU model parallelism (§3.2): each tower's convolutions on a device of its own."""

import torch
import torch.nn.functional as F

from model.alexnet import AlexNet


class ModelParallelAlexNet(AlexNet):
    """AlexNet(towers=2) with tower t's conv layers on devices[t]; state_dict keys and shapes are AlexNet's.

    The FC layers stay whole on devices[0]. The paper split them by output halves to fit 3 GB GPUs; they are
    ~8 % of the multiply-adds and any modern GPU holds them, and splitting them would add two all-to-all
    exchanges (into fc7 and fc8) per step. Move the model with its constructor, not .to(device).
    """

    def __init__(self, devices=("cuda:0", "cuda:1"), num_classes=1000):
        if len(devices) != 2:
            raise ValueError(f"ModelParallelAlexNet needs exactly two devices, got {devices}")
        super().__init__(num_classes, towers=2)
        self.devices = tuple(torch.device(d) for d in devices)
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            for tower, device in zip(conv, self.devices):
                tower.to(device)
        for fc in (self.fc6, self.fc7, self.fc8):
            fc.to(self.devices[0])
        # Each device holds one tower's maps, so one LRN group per call is the tower-local window.
        self.lrn1.groups = self.lrn2.groups = 1

    def _to_all(self, xs):
        """Every device gets both towers' maps, tower A's first (the channel order conv3 was built with)."""
        return [torch.cat([x.to(d, non_blocking=True) for x in xs], 1) for d in self.devices]

    def forward(self, x):
        # Each line issues tower A's then tower B's kernels; they are asynchronous, so the devices overlap.
        towers = range(2)
        h = [x.to(d, non_blocking=True) for d in self.devices]
        h = [self.pool1(self.lrn1(F.relu_(self.conv1[t](h[t])))) for t in towers]
        h = [self.pool2(self.lrn2(F.relu_(self.conv2[t](h[t])))) for t in towers]
        h = self._to_all(h)
        h = [F.relu_(self.conv3[t](h[t])) for t in towers]
        h = [F.relu_(self.conv4[t](h[t])) for t in towers]
        h = [self.pool5(F.relu_(self.conv5[t](h[t]))) for t in towers]
        return self.classify(torch.cat([hi.to(self.devices[0], non_blocking=True) for hi in h], 1))

"""AlexNet as in the paper (§3, Figure 2): five conv layers in two towers, LRN, overlapping pooling, three FC layers."""

import torch
import torch.nn.functional as F
from torch import nn

from model.lrn import LocalResponseNorm

TOWER_CONVS = ("dense", "grouped", "split")


class TowerConv(nn.ModuleList):
    """One conv layer split into towers: entry t is tower t's nn.Conv2d (key `convN.t.weight`).

    Tower t's filters see all input maps when `cross` (conv1, conv3) and only tower t's maps otherwise
    (conv2, conv4, conv5, §3.2). One module per tower lets ModelParallelAlexNet put each on its own device
    under the same state_dict keys and shapes. On one device `impl` picks how the towers run, all the same maths:
    "dense", one conv whose weight is block-diagonal (zeros between towers: +57 % multiply-adds over the whole
    net, on cuDNN's dense kernels); "grouped", one conv with groups=2; "split", one conv per tower, then a concat.
    Which is fastest is a property of the GPU and the compiler: `tools/bench_io.py --tower-convs` measures it.
    """

    def __init__(self, cin, cout, kernel, stride=1, padding=0, towers=2, cross=False, impl="dense"):
        super().__init__(
            nn.Conv2d(cin if cross else cin // towers, cout // towers, kernel, stride, padding) for _ in range(towers)
        )
        if impl not in TOWER_CONVS:
            raise ValueError(f"tower conv {impl!r}: use one of {', '.join(TOWER_CONVS)}")
        self.cross, self.impl = cross, impl

    def merged(self):
        """The towers' weights and biases as one dense conv over all input maps."""
        if len(self) == 1:
            return self[0].weight, self[0].bias
        ws = [conv.weight for conv in self]
        if not self.cross:
            cin = ws[0].shape[1]
            ws = [F.pad(w, (0, 0, 0, 0, t * cin, (len(ws) - 1 - t) * cin)) for t, w in enumerate(ws)]
        return torch.cat(ws), torch.cat([conv.bias for conv in self])

    def forward(self, x):
        conv = self[0]
        if self.cross or len(self) == 1 or self.impl == "dense":
            weight, bias = self.merged()
            return F.conv2d(x, weight, bias, conv.stride, conv.padding)
        if self.impl == "grouped":
            weight, bias = torch.cat([c.weight for c in self]), torch.cat([c.bias for c in self])
            return F.conv2d(x, weight, bias, conv.stride, conv.padding, groups=len(self))
        return torch.cat([c(part) for c, part in zip(self, x.chunk(len(self), 1))], 1)


class AlexNet(nn.Module):
    """The paper's network; towers=1 is the same widths without the tower split; tower_convs: see TowerConv."""

    def __init__(self, num_classes=1000, towers=2, tower_convs="dense"):
        super().__init__()
        if towers not in (1, 2):
            raise ValueError(f"towers must be 1 or 2, got {towers}")
        self.towers = towers
        # The paper's 224x224 input with stride 4 and 11x11 kernels gives 55x55 maps only for 227 pixels
        # or 2 pixels of zero padding; padding=2 keeps 224 inputs and the paper's 55x55 (then 27, 13, 6).
        self.conv1 = TowerConv(3, 96, 11, stride=4, padding=2, towers=towers, cross=True, impl=tower_convs)
        self.lrn1 = LocalResponseNorm(groups=towers)
        self.pool1 = nn.MaxPool2d(3, 2)  # §3.4 overlapping pooling: z = 3, s = 2
        self.conv2 = TowerConv(96, 256, 5, padding=2, towers=towers, impl=tower_convs)
        self.lrn2 = LocalResponseNorm(groups=towers)
        self.pool2 = nn.MaxPool2d(3, 2)
        self.conv3 = TowerConv(256, 384, 3, padding=1, towers=towers, cross=True, impl=tower_convs)
        self.conv4 = TowerConv(384, 384, 3, padding=1, towers=towers, impl=tower_convs)
        self.conv5 = TowerConv(384, 256, 3, padding=1, towers=towers, impl=tower_convs)
        self.pool5 = nn.MaxPool2d(3, 2)
        self.fc6 = nn.Linear(256 * 6 * 6, 4096)
        self.fc7 = nn.Linear(4096, 4096)
        self.fc8 = nn.Linear(4096, num_classes)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """§5: weights N(0, 0.01); biases 1 in conv2, conv4, conv5, fc6, fc7 (early positive ReLU inputs), else 0."""
        for name, module in self.named_modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.normal_(0.0, 0.01)
                module.bias.fill_(1.0 if name.split(".")[0] in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0)

    def classify(self, x):
        """pool5 maps -> class scores; inputs smaller than 224 are pooled to the 6x6 that fc6 expects."""
        if x.shape[-2:] != (6, 6):
            x = F.adaptive_avg_pool2d(x, 6)
        x = x.flatten(1)
        # §4.2 dropout on the outputs of fc6 and fc7; dropping before the ReLU is the same function and
        # lets both run in place (a Linear's backward does not need its output).
        x = F.relu_(F.dropout(self.fc6(x), 0.5, self.training, inplace=True))
        x = F.relu_(F.dropout(self.fc7(x), 0.5, self.training, inplace=True))
        return self.fc8(x)

    def forward(self, x):
        x = self.pool1(self.lrn1(F.relu_(self.conv1(x))))
        x = self.pool2(self.lrn2(F.relu_(self.conv2(x))))
        x = F.relu_(self.conv3(x))
        x = F.relu_(self.conv4(x))
        x = self.pool5(F.relu_(self.conv5(x)))
        return self.classify(x)

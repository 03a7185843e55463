"""Class colours shared by every label overlay (Figure 2, the data figure), for any class count.

Up to 19 foreground classes (the paper's 8 and 15, the phantoms' 15) class ``c`` is ``tab20``'s
colour ``c``, as the figures always drew them. With more (TotalSegmentator's 117), ``tab20``'s
colours would repeat every 20 classes and neighbouring organs with near ids (vertebrae L1-L5)
would look alike: the classes then cycle through the 60 colours of ``tab20``, ``tab20b`` and
``tab20c`` with a stride of 13, so consecutive ids get colours of different hues, and a colour
repeats only 60 ids apart.
"""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.colors import BoundaryNorm, ListedColormap

SMALL = 20  # classes (background included) drawn with tab20 alone
STRIDE = 13  # coprime with 60: class ids walk the whole palette before a colour repeats


def class_colors(num_classes: int) -> list[tuple[float, float, float, float]]:
    """RGBA colours of the foreground classes ``1..num_classes-1`` (index ``c - 1`` is class ``c``)."""
    if num_classes <= SMALL:
        return [matplotlib.colormaps["tab20"](c % 20) for c in range(1, num_classes)]
    palette = [matplotlib.colormaps[name](i) for name in ("tab20", "tab20b", "tab20c") for i in range(20)]
    return [palette[(c * STRIDE) % len(palette)] for c in range(1, num_classes)]


def class_colormap(num_classes: int) -> tuple[ListedColormap, BoundaryNorm]:
    """A colormap and norm that draw a label array's value ``c`` in :func:`class_colors`' colour.

    Mask the background (``np.ma.masked_equal(label, 0)``) before ``imshow(..., cmap=, norm=)``.
    """
    num_classes = max(int(num_classes), 2)
    cmap = ListedColormap(class_colors(num_classes))
    return cmap, BoundaryNorm(np.arange(0.5, num_classes), cmap.N)

"""Independent NumPy/SciPy references of the consolidation maths (smoothing, PyTorch bicubic), shared
by the consolidation and sampler tests."""

import numpy as np
from scipy import ndimage


def scipy_adaptive_smooth(s: np.ndarray) -> np.ndarray:
    """The reference smoothing written with scipy/numpy on one float32 grid."""
    s = s.astype(np.float32)
    g = ndimage.gaussian_filter(s, sigma=1.5, mode="reflect")
    v = ndimage.generic_filter(s, np.var, size=5)
    v = (v - v.min()) / (v.max() - v.min() + np.float32(1e-8))
    wt = np.float32(1.0) - v * np.float32(0.7)
    m = wt * g + (np.float32(1.0) - wt) * s
    peak = s > np.float32(np.percentile(s, 90))
    m[peak] = np.float32(0.7) * s[peak] + np.float32(0.3) * m[peak]
    if m.max() > m.min():
        m = (m - m.min()) / (m.max() - m.min())
        m = m * (s.max() - s.min()) + s.min()
    return m.astype(np.float32)


def torch_bicubic_direct(x: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """PyTorch's bicubic formula evaluated point by point (float64), align_corners=False, A=-0.75."""
    a = -0.75

    def coeffs(t):
        c1 = lambda z: ((a + 2) * z - (a + 3)) * z * z + 1  # noqa: E731
        c2 = lambda z: ((a * z - 5 * a) * z + 8 * a) * z - 4 * a  # noqa: E731
        return [c2(t + 1), c1(t), c1(1 - t), c2(2 - t)]

    h, w = x.shape
    out = np.zeros((out_h, out_w))
    for oy in range(out_h):
        sy = (oy + 0.5) * h / out_h - 0.5
        by = int(np.floor(sy))
        wy = coeffs(sy - by)
        for ox in range(out_w):
            sx = (ox + 0.5) * w / out_w - 0.5
            bx = int(np.floor(sx))
            wx = coeffs(sx - bx)
            acc = 0.0
            for ky in range(4):
                yy = min(max(by - 1 + ky, 0), h - 1)
                row = sum(wx[kx] * x[yy, min(max(bx - 1 + kx, 0), w - 1)] for kx in range(4))
                acc += wy[ky] * row
            out[oy, ox] = acc
    return out

"""pallas backend: not built yet (placeholder so the dispatch table is complete)."""


def available() -> bool:
    return False


def supports(spec, platform) -> bool:
    del spec, platform
    return False


def matmul(x, w, scale, zero_point, spec, platform=None):
    raise NotImplementedError("the pallas backend is not built yet")

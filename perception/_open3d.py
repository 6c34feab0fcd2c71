"""Import open3d on a bare machine.

The open3d 0.20 wheel links against the system's libusb-1.0.so.0, which a bare machine (or a laptop without
root) lacks. The `libusb-package` wheel carries that library: loading it globally first lets the import
succeed with nothing installed by hand.
"""

from __future__ import annotations

import ctypes
import functools
from types import ModuleType


@functools.cache
def import_open3d() -> ModuleType:
    try:
        import libusb_package

        library = libusb_package.get_library_path()
        if library is not None:
            ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)
    except (ImportError, OSError):
        pass  # fall through: the system may provide libusb itself
    try:
        import open3d
    except ImportError as err:
        raise ImportError(
            f"open3d could not be imported ({err}). Install the missing system library, e.g. "
            "`apt-get install libusb-1.0-0 libgl1 libgomp1`, or `pip install libusb-package`."
        ) from err
    open3d.utility.set_verbosity_level(open3d.utility.VerbosityLevel.Error)
    return open3d

"""Run portable ``test_*`` functions on any Python, MicroPython included.

MicroPython has no pytest, so this walks a case module, calls each test
and prints one line per test and a last line ``RESULT passed=N
failed=M``. The CPython side reads that line rather than trusting an exit
status, which one of the ports does not set.
"""

import gc
import sys


def main(root, data, module_names):
    """Run the cases of ``module_names`` with ``root`` on the path."""
    if root not in sys.path:
        sys.path.insert(0, root)
    passed = 0
    failed = 0
    for module_name in module_names:
        module = __import__(module_name)
        module.DATA = data
        names = [name for name in dir(module) if name.startswith("test_")]
        # dir() follows dict order, which MicroPython does not keep.
        names.sort()
        for name in names:
            gc.collect()
            try:
                getattr(module, name)()
            except Exception as error:
                failed += 1
                print("FAIL", module_name + "." + name, repr(error))
                show = getattr(sys, "print_exception", None)
                if show is not None:
                    show(error)
                continue
            passed += 1
            print("PASS", module_name + "." + name)
    print("RESULT passed=" + str(passed) + " failed=" + str(failed))
    return failed == 0

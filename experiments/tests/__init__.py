# A package, so that pytest imports this folder's conftest.py as "tests.conftest": two conftest.py files in folders
# that are not packages are both imported as the module "conftest", the later replacing the earlier, and the
# library's tests read their helpers from theirs (``from conftest import needs_data``).

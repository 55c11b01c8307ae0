"""The one exception type for mistakes a user can fix (bad config value, missing file, malformed data).

The entry point prints it as a single line and exits non-zero; anything else is a bug and keeps its traceback.
"""


class SafetyLabError(Exception):
    pass

"""The error raised for bad task or data input (dataset names, missing or corrupt data files,
task settings).

``TaskError`` messages name the problem and the fix; the command line prints them without a
traceback. It subclasses ValueError so library users can catch it as such.
"""


class TaskError(ValueError):
    """Bad task or data input from the user. The message names the problem and the fix."""

"""Errors raised for bad user input (configs, files, dataset names).

``UserError`` messages name the problem and the fix; the CLI prints them without a traceback.
It subclasses ValueError so library users can catch it as such.
"""


class UserError(ValueError):
    """Bad input from the user. The message names the problem and the fix."""

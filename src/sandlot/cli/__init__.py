"""The ``sandlot`` command line."""

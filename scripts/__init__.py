"""The repository's command-line scripts (bench, tune, checks). A package only so that their shared modules
import as ``scripts.<name>`` from the repository root, ahead of any other top-level ``scripts`` on the path;
not installed (pyproject lists the packages).
"""

"""The jobs: importing one imports the App first, which imports every job and calls its register()."""

import app  # noqa: F401

"""``qtee serve --tee optee --ta-module tests._optee_tas_serve``: the TAs of
tests/_optee_tas.py, registered on import."""

from tests._optee_tas import install

install()

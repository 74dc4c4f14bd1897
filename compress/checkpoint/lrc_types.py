"""The module types ``modeling_lrc.build_module`` builds (spec type -> builder), inside lrc: every type registered in
``module_types.py`` (the core ``lowrank`` and ``dense``, and those the method packages register when
``compress.methods`` is imported, which ``import compress`` does). A checkpoint carries its own ``lrc_types.py``
instead, written at save time with the builders of the types it uses, each imported relatively from its file
(``module_types.remote_code``)."""
from .module_types import BUILDERS as MODULE_TYPES

__all__ = ["MODULE_TYPES"]

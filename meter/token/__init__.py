"""The PKCS#11 boundary: the only package that imports ``pkcs11``."""

from meter.token.kat import KatResult, run_token_kats
from meter.token.module import Pkcs11Module, load_module
from meter.token.profile import (
    Durability,
    HsmProfile,
    KeyAlgorithm,
    default_profile_path,
    load_profile,
)
from meter.token.session import DataObject, Login, Token
from meter.token.softhsm import (
    ensure_conf,
    ensure_token,
    softhsm_env,
    token_copies_dir,
    token_dir,
)
from meter.token.token_files import (
    Restored,
    check_token_object,
    guard_token_files,
    keep_verified_copy,
)

__all__ = [
    "DataObject",
    "Durability",
    "HsmProfile",
    "KatResult",
    "KeyAlgorithm",
    "Login",
    "Pkcs11Module",
    "Restored",
    "Token",
    "check_token_object",
    "default_profile_path",
    "ensure_conf",
    "ensure_token",
    "guard_token_files",
    "keep_verified_copy",
    "load_module",
    "load_profile",
    "run_token_kats",
    "softhsm_env",
    "token_copies_dir",
    "token_dir",
]

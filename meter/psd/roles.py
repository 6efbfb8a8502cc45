"""Roles and services of the security policy, and Table 2: which role may call what.

The table below is the only copy: the firmware enforces it and `meter policy`
prints it. Services marked for No-Role need no logon and are open to every
caller; every other service is allowed exactly to the roles marked.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "AUDIT_LOG_SERVICES",
    "ISSUING_SERVICES",
    "MATRIX",
    "TABLE_2",
    "Role",
    "Service",
    "allowed",
    "roles_for",
]


class Role(StrEnum):
    ADMINISTRATOR = "administrator"
    AUDITOR = "auditor"
    CERTIFICATE_AUTHORITY = "certificate-authority"
    CUSTOMER = "customer"
    KEY_CUSTODIAN = "key-custodian"
    PROVIDER = "provider"
    SECURITY_OFFICER = "security-officer"
    NO_ROLE = "no-role"

    @property
    def display(self) -> str:
        return _TITLES[self]


_TITLES = {
    Role.ADMINISTRATOR: "Administrator",
    Role.AUDITOR: "Auditor",
    Role.CERTIFICATE_AUTHORITY: "Certificate Authority",
    Role.CUSTOMER: "Customer",
    Role.KEY_CUSTODIAN: "Key Custodian",
    Role.PROVIDER: "Provider",
    Role.SECURITY_OFFICER: "Security Officer",
    Role.NO_ROLE: "No-Role",
}


class Service(StrEnum):
    KEY_ADMINISTRATION = "key-administration"
    AUTHORIZE_CUSTOMER = "authorize-customer"
    AUTHORIZE_PSD = "authorize-psd"
    ADMINISTRATION_AUTHORIZATION = "administration-authorization"
    CHANGE_USER_PASSWORD = "change-user-password"
    SESSION_MANAGEMENT = "session-management"
    CREATE_USER = "create-user"
    CREATE_AUDIT_KEY = "create-audit-key"
    CREATE_INDICIUM = "create-indicium"
    CREATE_CORRECTION_INDICIUM = "create-correction-indicium"
    WITHDRAW_PSD = "withdraw-psd"
    DELETE_USER = "delete-user"
    REQUEST_DEVICE_AUDIT = "request-device-audit"
    DOWNLOAD_POSTAGE_VALUE = "download-postage-value"
    EXPORT_AUDIT_KEY = "export-audit-key"
    KEY_EXCHANGE = "key-exchange"
    LOGOFF = "logoff"
    LOGON = "logon"
    MODIFY_USER = "modify-user"
    RETRIEVE_PSD_STATUS = "retrieve-psd-status"
    RETRIEVE_PSD_PUBLIC_KEY = "retrieve-psd-public-key"
    SET_CLOCK = "set-clock"
    REQUEST_STATUS = "request-status"
    UPDATE_PSC = "update-psc"
    VIEW_USERS = "view-users"
    # Section 4: "An Auditor manages (views, saves, archives, and deletes) audit logs."
    VIEW_AUDIT_LOG = "view-audit-log"
    SAVE_AUDIT_LOG = "save-audit-log"
    ARCHIVE_AUDIT_LOG = "archive-audit-log"
    DELETE_AUDIT_RECORDS = "delete-audit-records"
    # Create Indicium for many pieces in one durable debit (docs/device.md, "Batches").
    CREATE_INDICIUM_BATCH = "create-indicium-batch"

    @property
    def display(self) -> str:
        return (
            " ".join(word.capitalize() for word in self.value.split("-"))
            .replace("Psd", "PSD")
            .replace("Psc", "PSC")
        )


AD, AU, CA, CU, KC, PR, SO, NR = (
    Role.ADMINISTRATOR,
    Role.AUDITOR,
    Role.CERTIFICATE_AUTHORITY,
    Role.CUSTOMER,
    Role.KEY_CUSTODIAN,
    Role.PROVIDER,
    Role.SECURITY_OFFICER,
    Role.NO_ROLE,
)

# Table 2 of the security policy ("Matrix of User Services and Roles"), row by row.
TABLE_2: dict[Service, frozenset[Role]] = {
    Service.KEY_ADMINISTRATION: frozenset({SO}),
    Service.AUTHORIZE_CUSTOMER: frozenset({PR}),
    Service.AUTHORIZE_PSD: frozenset({CA}),
    Service.ADMINISTRATION_AUTHORIZATION: frozenset({SO}),
    Service.CHANGE_USER_PASSWORD: frozenset({AD, AU, KC, SO}),
    Service.SESSION_MANAGEMENT: frozenset({NR}),
    Service.CREATE_USER: frozenset({AD}),
    Service.CREATE_AUDIT_KEY: frozenset({SO}),
    Service.CREATE_INDICIUM: frozenset({CU}),
    Service.CREATE_CORRECTION_INDICIUM: frozenset({CU}),
    Service.WITHDRAW_PSD: frozenset({PR}),
    Service.DELETE_USER: frozenset({AD}),
    Service.REQUEST_DEVICE_AUDIT: frozenset({NR}),
    Service.DOWNLOAD_POSTAGE_VALUE: frozenset({PR}),
    Service.EXPORT_AUDIT_KEY: frozenset({AU}),
    Service.KEY_EXCHANGE: frozenset({KC}),
    Service.LOGOFF: frozenset({AD, AU, KC, SO}),
    Service.LOGON: frozenset({NR}),
    Service.MODIFY_USER: frozenset({AD}),
    Service.RETRIEVE_PSD_STATUS: frozenset({CU}),
    Service.RETRIEVE_PSD_PUBLIC_KEY: frozenset({NR}),
    Service.SET_CLOCK: frozenset({AD}),
    Service.REQUEST_STATUS: frozenset({AD, AU, CA, CU, KC, PR, SO, NR}),
    Service.UPDATE_PSC: frozenset({SO}),
    Service.VIEW_USERS: frozenset({AD, AU, SO}),
}

# Section 4's Auditor duties, which Table 2 does not list as rows.
AUDIT_LOG_SERVICES: dict[Service, frozenset[Role]] = {
    Service.VIEW_AUDIT_LOG: frozenset({AU}),
    Service.SAVE_AUDIT_LOG: frozenset({AU}),
    Service.ARCHIVE_AUDIT_LOG: frozenset({AU}),
    Service.DELETE_AUDIT_RECORDS: frozenset({AU}),
}

# Services beyond Table 2 that do what one of its rows does, many times over: each is
# allowed to exactly the roles of that row, so the table stays the one source.
ISSUING_SERVICES: dict[Service, frozenset[Role]] = {
    Service.CREATE_INDICIUM_BATCH: TABLE_2[Service.CREATE_INDICIUM],
}

MATRIX: dict[Service, frozenset[Role]] = {**TABLE_2, **AUDIT_LOG_SERVICES, **ISSUING_SERVICES}


def allowed(role: Role, service: Service) -> bool:
    """May a caller in ``role`` (NO_ROLE when nobody is logged on) use ``service``?"""
    marked = MATRIX[service]
    return NR in marked or role in marked


def roles_for(service: Service) -> frozenset[Role]:
    return MATRIX[service]

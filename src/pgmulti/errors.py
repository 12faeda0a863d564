"""SQLSTATE names and PgError, the exception the proxy turns into an ErrorResponse."""

# Names as in PostgreSQL's errcodes.txt.
SUCCESSFUL_COMPLETION = "00000"
CONNECTION_EXCEPTION = "08000"
CONNECTION_FAILURE = "08006"
PROTOCOL_VIOLATION = "08P01"
FEATURE_NOT_SUPPORTED = "0A000"
INVALID_PARAMETER_VALUE = "22023"
IDLE_IN_TRANSACTION_SESSION_TIMEOUT = "25P03"
TRANSACTION_TIMEOUT = "25P04"
INVALID_AUTHORIZATION_SPECIFICATION = "28000"
INVALID_PASSWORD = "28P01"
INVALID_CATALOG_NAME = "3D000"
SYNTAX_ERROR = "42601"
INSUFFICIENT_PRIVILEGE = "42501"
UNDEFINED_OBJECT = "42704"
TOO_MANY_CONNECTIONS = "53300"
OBJECT_NOT_IN_PREREQUISITE_STATE = "55000"
QUERY_CANCELED = "57014"
ADMIN_SHUTDOWN = "57P01"
CANNOT_CONNECT_NOW = "57P03"
IDLE_SESSION_TIMEOUT = "57P05"
INTERNAL_ERROR = "XX000"


class PgError(Exception):
    """An error to report to a client as ErrorResponse; `fatal` means the connection closes."""

    def __init__(self, sqlstate: str, message: str, *, detail: str | None = None,
                 hint: str | None = None, fatal: bool = False):
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.detail = detail
        self.hint = hint
        self.fatal = fatal

    @property
    def severity(self) -> str:
        return "FATAL" if self.fatal else "ERROR"


class ServerProtocolRefused(PgError):
    """A server refused the protocol version we asked for before authentication (an old
    PostgreSQL or another pooler that cannot answer NegotiateProtocolVersion): log in again
    with protocol 3.0 rather than fail the client."""


def fatal(sqlstate: str, message: str, **kwargs) -> PgError:
    return PgError(sqlstate, message, fatal=True, **kwargs)


# One constructor per failure a client can see, so wording and codes stay consistent.

def no_such_database(name: str) -> PgError:
    return fatal(INVALID_CATALOG_NAME, f'no such database: {name}')


def no_such_user(user: str) -> PgError:
    return fatal(INVALID_AUTHORIZATION_SPECIFICATION, f'no such user: {user}')


def password_failed(user: str) -> PgError:
    return fatal(INVALID_PASSWORD, f'password authentication failed for user "{user}"')


def too_many_clients() -> PgError:
    return fatal(TOO_MANY_CONNECTIONS, "no more connections allowed (max_client_conn)")


def query_wait_timeout() -> PgError:
    return fatal(TOO_MANY_CONNECTIONS, "query_wait_timeout",
                 detail="no server connection became available in time")


def login_timeout() -> PgError:
    return fatal(QUERY_CANCELED, "client_login_timeout",
                 detail="the client did not finish logging in in time")


def server_unreachable(reason: str) -> PgError:
    return fatal(CONNECTION_FAILURE, "server connection failed", detail=reason)


def server_login_failing() -> PgError:
    return fatal(CONNECTION_FAILURE,
                 "server login has been failing, try again later (server_login_retry)")


def server_closed(reason: str) -> PgError:
    return fatal(CONNECTION_FAILURE, "server conn crashed?", detail=reason)


def shutting_down() -> PgError:
    return fatal(ADMIN_SHUTDOWN, "pgmulti is shutting down")


def protocol_violation(message: str) -> PgError:
    return fatal(PROTOCOL_VIOLATION, message)

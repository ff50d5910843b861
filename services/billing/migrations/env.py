import services.billing.models  # noqa: F401  (registers every table of the service)
from services.billing.db import Base
from shared.migrate import run_env

run_env(Base.metadata, "alembic_version_billing")

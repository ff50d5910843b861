from services.vehicleregistry.models import Base
from shared.migrate import run_env

run_env(Base.metadata, "alembic_version_vehicleregistry")

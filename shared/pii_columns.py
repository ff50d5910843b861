"""Phones and plates encrypted at rest, with blind indexes for look-ups (docs/privacy.md).

* `Encrypted`: a column type that stores `shared.pii.encrypt(...)` and reads back plaintext
  (`shared.pii.reveal`, so rows not yet converted still read). Code keeps plaintext in memory
  (`session.plate`); only the database holds ciphertext. Comparing such a column is refused:
  each encryption draws a fresh nonce, so `plate == :x` would silently match nothing.
* `keep_blind_index`: keeps a `<name>_bidx` column (HMAC of the plaintext, `index_of`) in step
  with the encrypted one on every ORM insert and update; look-ups and uniqueness use it.
* `bind_data_keys`: the keys a process encrypts with travel with its engine (the dialect), so
  several cities in one process (tests) each use their own; an engine without them falls back
  to the environment's settings (`get_settings`, e.g. the CLI).
* `convert_table`: the batch conversion migrations and `citypark keys rotate-data` share.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    Connection,
    Engine,
    MetaData,
    String,
    Text,
    TypeDecorator,
    event,
    func,
    inspect,
    select,
    tuple_,
    update,
)
from sqlalchemy.orm import Session
from sqlalchemy.sql import column, operators, table

from shared import pii
from shared.settings import Settings, get_settings

# Room for `pii1.<key id>.` plus base64 of nonce, up to ~60 bytes of text and the GCM tag.
ENCRYPTED_LENGTH = 255
INDEX_LENGTH = 32
_SETTINGS_ATTR = "citypark_data_settings"
# (table, encrypted column) → kind of its blind index, as `keep_blind_index` registered them.
INDEXED: dict[tuple[str, str], str] = {}


def bind_data_keys(engine: Engine, settings: Settings) -> Engine:
    setattr(engine.dialect, _SETTINGS_ATTR, settings)
    return engine


def settings_of(bind: Any) -> Settings:
    """The settings whose keys a dialect, engine, connection or session encrypts with."""
    if isinstance(bind, Session):
        bind = bind.get_bind()
    dialect = getattr(bind, "dialect", bind)
    bound: Settings | None = getattr(dialect, _SETTINGS_ATTR, None)
    return bound if bound is not None else get_settings()


def index_of(settings: Settings, kind: str, value: str) -> str:
    """The blind index of a phone (`kind="phone"`) or plate (`kind="plate"`, plate alone, so a
    plate is found whatever colour was given; queries add `plate_color` themselves)."""
    return pii.blind_index(settings, kind, value)


def index_in(db: Session | Connection, kind: str, value: str) -> str:
    return index_of(settings_of(db), kind, value)


def _refuse(op: Any) -> None:
    if operators.is_comparison(op) and op not in (operators.is_, operators.is_not):
        raise TypeError(
            "an encrypted column cannot be compared in SQL; compare its `_bidx` column "
            "with shared.pii_columns.index_of(...)"
        )


class Encrypted(TypeDecorator[str]):
    """A phone or plate: ciphertext in the database, plaintext in Python."""

    impl = String(ENCRYPTED_LENGTH)
    cache_ok = True

    class comparator_factory(TypeDecorator.Comparator[str]):  # type: ignore[name-defined]
        def operate(self, op: Any, *other: Any, **kwargs: Any) -> Any:
            _refuse(op)
            return super().operate(op, *other, **kwargs)

        def reverse_operate(self, op: Any, other: Any, **kwargs: Any) -> Any:
            _refuse(op)
            return super().reverse_operate(op, other, **kwargs)

    def process_bind_param(self, value: str | None, dialect: Any) -> str | None:
        if value is None or pii.is_encrypted(value):
            return value  # already ciphertext (a conversion copying values as they are)
        return pii.encrypt(settings_of(dialect), value)

    def process_result_value(self, value: str | None, dialect: Any) -> str | None:
        if value is None or not pii.is_encrypted(value):
            return value
        return pii.decrypt(settings_of(dialect), value)


class EncryptedText(Encrypted):
    """A document holding personal data (an event kept for later), encrypted whole."""

    impl = Text()
    cache_ok = True


def keep_blind_index(model: type, field: str, kind: str) -> None:
    """Keep `<field>_bidx` the blind index of `<field>` on every ORM insert and update."""
    index_field = f"{field}_bidx"
    INDEXED[(model.__table__.name, field)] = kind  # type: ignore[attr-defined]

    def set_index(_mapper: Any, connection: Connection, target: Any) -> None:
        value = getattr(target, field)
        setattr(
            target,
            index_field,
            None if value is None else index_of(settings_of(connection), kind, value),
        )

    def on_update(mapper: Any, connection: Connection, target: Any) -> None:
        if inspect(target).attrs[field].history.has_changes():
            set_index(mapper, connection, target)

    event.listen(model, "before_insert", set_index)
    event.listen(model, "before_update", on_update)


@dataclass(frozen=True)
class PiiColumn:
    """One encrypted column of a table and the kind of its blind index (None: no index)."""

    name: str
    kind: str | None


@dataclass(frozen=True)
class PiiTable:
    name: str
    key: str | tuple[str, ...]  # the primary key (or another unique key) to walk the table by
    columns: tuple[PiiColumn, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return (self.key,) if isinstance(self.key, str) else self.key


def _raw(t: PiiTable, *, with_index: bool = True) -> Any:
    cols = [column(k, String()) for k in t.keys]
    for c in t.columns:
        cols.append(column(c.name, String()))
        if c.kind and with_index:
            cols.append(column(f"{c.name}_bidx", String()))
    return table(t.name, *cols)


Transform = Callable[[str], str]


def convert_table(
    conn_factory: Callable[[], Any],
    t: PiiTable,
    *,
    settings: Settings,
    value: Transform,
    reindex: bool,
    needs: Callable[[str | None], bool],
    batch_size: int = 500,
    dry_run: bool = False,
    progress: Callable[[int], None] | None = None,
) -> int:
    """Walk `t` in key order, batch by batch; in each row whose value `needs` work, store
    `value(v)` and, when `reindex`, the blind index of its plaintext. Every batch runs in
    the transaction `conn_factory()` opens (a context manager giving a Connection), so a long
    conversion holds no lock for long and a stopped one resumes where it left. Returns the
    rows changed (or that would change, `dry_run`)."""
    raw = _raw(t)
    key = tuple_(*(raw.c[k] for k in t.keys))
    after: tuple[Any, ...] | None = None
    changed = 0
    while True:
        with conn_factory() as conn:
            q = select(*raw.c).order_by(*key.clauses).limit(batch_size)
            if after is not None:
                q = q.where(key > after)
            rows = conn.execute(q).mappings().all()
            if not rows:
                return changed
            for row in rows:
                patch: dict[str, Any] = {}
                for c in t.columns:
                    v = row[c.name]
                    if v is None:
                        continue
                    if needs(v):
                        patch[c.name] = value(v)
                    if c.kind and (reindex or row[f"{c.name}_bidx"] is None):
                        bidx = index_of(settings, c.kind, pii.reveal(settings, v))
                        if bidx != row[f"{c.name}_bidx"]:
                            patch[f"{c.name}_bidx"] = bidx
                if patch:
                    changed += 1
                    if not dry_run:
                        # Only if no one changed the row meanwhile (services keep running):
                        # a value written since is already under the current keys.
                        here = tuple(row[k] for k in t.keys)
                        same = [
                            raw.c[c.name].is_(None)
                            if row[c.name] is None
                            else raw.c[c.name] == row[c.name]
                            for c in t.columns
                        ]
                        conn.execute(update(raw).where(key == here, *same).values(**patch))
            after = tuple(rows[-1][k] for k in t.keys)
        if progress is not None:
            progress(len(rows))


def count_rows(conn: Connection, t: PiiTable) -> int:
    return int(conn.scalar(select(func.count()).select_from(table(t.name))) or 0)


def pii_tables(metadata: MetaData) -> list[PiiTable]:
    """Every table of `metadata` with encrypted columns, as the models declare them."""
    found = []
    for t in metadata.sorted_tables:
        cols = tuple(
            PiiColumn(c.name, INDEXED.get((t.name, c.name)))
            for c in t.columns
            if isinstance(c.type, Encrypted)
        )
        if cols:
            found.append(PiiTable(t.name, tuple(c.name for c in t.primary_key.columns), cols))
    return found


def encrypt_in_migration(conn: Connection, tables: Iterable[PiiTable]) -> None:
    """Encrypt and index every value still in clear (an upgrade, in the migration's
    transaction; batches only bound the memory)."""
    settings = migration_settings()
    for t in tables:
        convert_table(
            _same(conn),
            t,
            settings=settings,
            value=lambda v: pii.encrypt(settings, v),
            reindex=False,
            needs=lambda v: v is not None and not pii.is_encrypted(v),
        )


def decrypt_in_migration(conn: Connection, tables: Iterable[PiiTable]) -> None:
    """Back to plaintext (a downgrade); fails on a value under a key this process lacks."""
    settings = migration_settings()
    for t in tables:
        plain = PiiTable(t.name, t.key, tuple(PiiColumn(c.name, None) for c in t.columns))
        convert_table(
            _same(conn),
            plain,
            settings=settings,
            value=lambda v: pii.decrypt(settings, v),
            reindex=False,
            needs=pii.is_encrypted,
        )


class _Same:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def __enter__(self) -> Connection:
        return self.conn

    def __exit__(self, *_: object) -> None:
        return None


def _same(conn: Connection) -> Callable[[], _Same]:
    return lambda: _Same(conn)


def migration_settings() -> Settings:
    """The settings the migration runs under: those `city.migrate` was given, else the
    environment's (alembic on the command line)."""
    from alembic import context

    given = context.config.attributes.get("settings")
    return given if given is not None else get_settings()

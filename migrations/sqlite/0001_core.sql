-- The broker's store on SQLite (the embedded default): the same tables as on Postgres, with
-- JSON as TEXT, timestamps as RFC 3339 TEXT and booleans as INTEGER. SQLite has one writer at a
-- time (BEGIN IMMEDIATE), so revision order is commit order by construction.

CREATE TABLE xpu_meta (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL,
    compacted_revision INTEGER NOT NULL
);
INSERT INTO xpu_meta (id, revision, compacted_revision) VALUES (1, 0, 0);

CREATE TABLE objects (
    kind TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    uid TEXT NOT NULL,
    generation INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    labels TEXT NOT NULL,
    spec TEXT NOT NULL,
    dpu TEXT,
    selector TEXT,
    spec_author TEXT NOT NULL,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    deleted_revision INTEGER,
    PRIMARY KEY (kind, namespace, name)
);
CREATE INDEX objects_by_dpu ON objects (dpu, kind) WHERE dpu IS NOT NULL AND deleted_revision IS NULL;
CREATE INDEX objects_tombstones ON objects (deleted_revision) WHERE deleted_revision IS NOT NULL;
CREATE UNIQUE INDEX objects_netdev_id ON objects (name) WHERE kind = 'Netdev' AND deleted_revision IS NULL;

CREATE TABLE statuses (
    kind TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    author TEXT NOT NULL,
    observed_generation INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    status TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    PRIMARY KEY (kind, namespace, name, author),
    FOREIGN KEY (kind, namespace, name) REFERENCES objects (kind, namespace, name) ON DELETE CASCADE
);
CREATE INDEX statuses_by_author ON statuses (author, seq);

CREATE TABLE log (
    revision INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    uid TEXT NOT NULL,
    generation INTEGER NOT NULL,
    change INTEGER NOT NULL,
    author TEXT NOT NULL,
    observed_generation INTEGER NOT NULL,
    labels TEXT NOT NULL,
    body TEXT,
    dpu TEXT,
    selector TEXT,
    prev_selector TEXT,
    at TEXT NOT NULL
);
CREATE INDEX log_by_object ON log (kind, namespace, name, revision);
CREATE INDEX log_by_dpu ON log (dpu, revision) WHERE dpu IS NOT NULL;
CREATE INDEX log_by_kind ON log (kind, revision);

CREATE TABLE dpus (
    serial TEXT PRIMARY KEY,
    ready INTEGER NOT NULL,
    last_heartbeat TEXT NOT NULL,
    lease_duration_ms INTEGER NOT NULL,
    applied_revision INTEGER NOT NULL,
    registered_at TEXT NOT NULL
);

CREATE TABLE ip_allocations (
    network TEXT NOT NULL,
    address TEXT NOT NULL,
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    revision INTEGER NOT NULL,
    PRIMARY KEY (network, address),
    UNIQUE (namespace, name)
);

CREATE TABLE ip_pools (
    network TEXT PRIMARY KEY,
    next_offset TEXT NOT NULL
);

-- The broker's store: objects (spec half), statuses (status half, one row per author), the
-- revision log, DPU leases and IPAM allocations.
--
-- Revision order is commit order: every writing transaction first locks the single row of
-- xpu_meta (SELECT ... FOR UPDATE), takes the next revisions from it and commits while holding
-- the lock, so no transaction can commit a lower revision after a higher one is visible.

CREATE TABLE xpu_meta (
    id smallint PRIMARY KEY CHECK (id = 1),
    -- Last revision handed out (= last committed, since the row lock serializes writers).
    revision bigint NOT NULL,
    -- Log entries and tombstones at or below this revision are gone.
    compacted_revision bigint NOT NULL
);
INSERT INTO xpu_meta (id, revision, compacted_revision) VALUES (1, 0, 0);

CREATE TABLE objects (
    kind text NOT NULL,
    namespace text NOT NULL,
    name text NOT NULL,
    uid uuid NOT NULL,
    generation bigint NOT NULL,
    -- Revision of the last spec, label or delete change (status changes live in statuses).
    revision bigint NOT NULL,
    labels jsonb NOT NULL,
    spec jsonb NOT NULL,
    -- Netdev: the DPU its netdevId names.
    dpu text,
    -- LogicalBridge, Vrf, Svi, FlowPolicy: the DPU label selector.
    selector jsonb,
    spec_author text NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    -- Set on tombstones.
    deleted_revision bigint,
    PRIMARY KEY (kind, namespace, name)
);
CREATE INDEX objects_by_dpu ON objects (dpu, kind) WHERE dpu IS NOT NULL AND deleted_revision IS NULL;
CREATE INDEX objects_tombstones ON objects (deleted_revision) WHERE deleted_revision IS NOT NULL;
-- A netdev id names one VF of the fleet: at most one live Netdev may carry it, in any namespace.
CREATE UNIQUE INDEX objects_netdev_id ON objects (name) WHERE kind = 'Netdev' AND deleted_revision IS NULL;

CREATE TABLE statuses (
    kind text NOT NULL,
    namespace text NOT NULL,
    name text NOT NULL,
    -- dpu/<serial> or broker.
    author text NOT NULL,
    observed_generation bigint NOT NULL,
    -- Per-author sequence number: a report not newer than the stored one is dropped.
    seq bigint NOT NULL,
    revision bigint NOT NULL,
    status jsonb NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (kind, namespace, name, author),
    FOREIGN KEY (kind, namespace, name) REFERENCES objects (kind, namespace, name) ON DELETE CASCADE
);
CREATE INDEX statuses_by_author ON statuses (author, seq);

CREATE TABLE log (
    revision bigint PRIMARY KEY,
    kind text NOT NULL,
    namespace text NOT NULL,
    name text NOT NULL,
    uid uuid NOT NULL,
    generation bigint NOT NULL,
    -- 1 spec, 2 status, 3 deleted.
    change smallint NOT NULL,
    author text NOT NULL,
    observed_generation bigint NOT NULL,
    labels jsonb NOT NULL,
    -- The new spec (1) or status (2); NULL for deletes and removal acknowledgements.
    body jsonb,
    -- Routing after the change (dpu for Netdevs, selector for fabric kinds) and, when a spec
    -- change moved the object, before it.
    dpu text,
    selector jsonb,
    prev_selector jsonb,
    at timestamptz NOT NULL
);
CREATE INDEX log_by_object ON log (kind, namespace, name, revision);
CREATE INDEX log_by_dpu ON log (dpu, revision) WHERE dpu IS NOT NULL;
CREATE INDEX log_by_kind ON log (kind, revision);

CREATE TABLE dpus (
    serial text PRIMARY KEY,
    ready boolean NOT NULL,
    last_heartbeat timestamptz NOT NULL,
    lease_duration_ms bigint NOT NULL,
    applied_revision bigint NOT NULL,
    registered_at timestamptz NOT NULL
);
CREATE INDEX dpus_ready_by_heartbeat ON dpus (last_heartbeat) WHERE ready;

CREATE TABLE ip_allocations (
    network text NOT NULL,
    address text NOT NULL,
    namespace text NOT NULL,
    name text NOT NULL,
    revision bigint NOT NULL,
    -- An address is handed out once per pool: the database, not the allocator, guarantees it.
    PRIMARY KEY (network, address),
    UNIQUE (namespace, name)
);

CREATE TABLE ip_pools (
    network text PRIMARY KEY,
    -- Offset (decimal, up to 2^64) from the network address where the next search starts.
    next_offset text NOT NULL
);

-- Indexes for the status API's bounded reads: netdevs by tenant node and by reported phase.
CREATE INDEX objects_netdev_node ON objects (json_extract(spec, '$.hostname'), namespace, name)
    WHERE kind = 'Netdev' AND deleted_revision IS NULL;
CREATE INDEX statuses_netdev_phase ON statuses (json_extract(status, '$.phase'), namespace, name)
    WHERE kind = 'Netdev';

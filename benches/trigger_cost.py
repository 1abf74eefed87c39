#!/usr/bin/env python3
"""Cost of the snapshot triggers on state writes (BENCHMARKS.md, issue 11 third pass).

Upserts 300k phones x 3 scopes plus the in-flight delete per operation, in
20k-operation transactions (as the writer thread does), without and with
the triggers of src/state/snapshot.rs; prints both times, 3 alternated runs.
Needs only the standard library: python3 benches/trigger_cost.py"""
import sqlite3, time, os, sys
def run(triggers):
    path='/tmp/trigger_cost.db'
    for s in ('','-wal','-shm'):
        try: os.remove(path+s)
        except FileNotFoundError: pass
    c=sqlite3.connect(path, isolation_level=None)
    c.executescript('''PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
    CREATE TABLE delivered (scope_id INTEGER NOT NULL, phone INTEGER NOT NULL, payload_hash INTEGER NOT NULL, delivered_at INTEGER NOT NULL, PRIMARY KEY (scope_id, phone)) WITHOUT ROWID;
    CREATE TABLE in_flight (scope_id INTEGER NOT NULL, phone INTEGER NOT NULL, payload_hash INTEGER NOT NULL, started_at INTEGER NOT NULL, PRIMARY KEY (scope_id, phone)) WITHOUT ROWID;''')
    if triggers:
        c.executescript('''CREATE TABLE snapshots (scope_id INTEGER PRIMARY KEY, slots BLOB NOT NULL);
    CREATE TRIGGER a AFTER INSERT ON delivered BEGIN DELETE FROM snapshots WHERE scope_id = NEW.scope_id; END;
    CREATE TRIGGER b AFTER UPDATE ON delivered BEGIN DELETE FROM snapshots WHERE scope_id IN (OLD.scope_id, NEW.scope_id); END;
    CREATE TRIGGER d AFTER DELETE ON delivered BEGIN DELETE FROM snapshots WHERE scope_id = OLD.scope_id; END;''')
    t=time.time()
    n=300000
    for start in range(0, n, 20000):
        c.execute('BEGIN')
        for i in range(start, start+20000):
            for scope in (1,2,3):
                ph=5511900000000+i*7919 % 100000000
                c.execute('INSERT INTO delivered VALUES (?,?,?,?) ON CONFLICT (scope_id, phone) DO UPDATE SET payload_hash = excluded.payload_hash, delivered_at = excluded.delivered_at', (scope, ph, i, 0))
                c.execute('DELETE FROM in_flight WHERE scope_id=? AND phone=?', (scope, ph))
        c.execute('COMMIT')
    return time.time()-t
for _ in range(3):
    print('no triggers %.2f s' % run(False), 'triggers %.2f s' % run(True))

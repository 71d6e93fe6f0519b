-- 0008_claim_index: the claim index carries the visibility time, so a claim reads only the
-- messages that are visible now. Before, the index was (queue, priority DESC, msg_id) and a
-- claim filtered vt on the heap: every leased, delayed or waiting-for-retry message at the head
-- of the index was visited on every claim (50,000 leased steps made an empty claim cost 23 ms).
-- Now a claim walks, per priority present (highest first), the range vt <= now in vt order
-- and stops at the first invisible entry. The price: an update of vt (a
-- claim's lease, an extension, a release, a retry's backoff) is no longer HOT.
--
-- The index holds neither `queue` nor `msg_id`: each queue's partition holds one queue
-- (partition pruning picks it), and a lookup by (queue, msg_id) (an acknowledgement, a lease
-- update) can then only take the primary key. A queue whose workers keep up has a handful of
-- live messages, so its statistics say "tiny" while its indexes may hold many dead entries (a
-- held snapshot keeps them); with `queue` or `msg_id` in this index, plans made on such
-- statistics took it for those lookups and walked it whole per message.
DROP INDEX tasker.queue_messages_claim_idx;
CREATE INDEX queue_messages_claim_idx ON tasker.queue_messages (priority DESC, vt);

-- The primary key leads with msg_id: a queue's partition holds one queue, so a leading `queue`
-- column bounds nothing, and a plan made on a near-empty queue took `queue = $1` alone as the
-- index condition (msg_id filtered), walking the whole queue per message. Led by msg_id, every
-- lookup of a message (an acknowledgement, a lease update, the locks of complete_steps and
-- extend_leases) is bounded by it whatever the statistics say.
ALTER TABLE tasker.queue_messages DROP CONSTRAINT queue_messages_pkey;
ALTER TABLE tasker.queue_messages ADD CONSTRAINT queue_messages_pkey PRIMARY KEY (msg_id, queue);

-- 0008_claim_index: the claim index carries the visibility time, so a claim reads only the
-- messages that are visible now. Before, the index was (queue, priority DESC, msg_id) and a
-- claim filtered vt on the heap: every leased, delayed or waiting-for-retry message at the head
-- of the index was visited on every claim (50,000 leased steps made an empty claim cost 23 ms).
-- Now a claim walks, per priority present (highest first), the range vt <= now in
-- (vt, msg_id) order and stops at the first invisible entry. The price: an update of vt (a
-- claim's lease, an extension, a release, a retry's backoff) is no longer HOT.
DROP INDEX tasker.queue_messages_claim_idx;
CREATE INDEX queue_messages_claim_idx ON tasker.queue_messages (queue, priority DESC, vt, msg_id);

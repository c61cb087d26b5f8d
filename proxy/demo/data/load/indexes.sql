CREATE INDEX ON billing.xdrs (i_account, connect_time);
CREATE INDEX ON billing.xdrs (i_account, i_xdr);
CREATE INDEX ON billing.accounts (i_customer);
CREATE INDEX ON billing.customer_cards (i_customer);
CREATE INDEX ON billing.aliases (i_account);
CREATE INDEX ON billing.phonebook (i_account);
CREATE INDEX ON billing.call_recordings (i_account);
CREATE INDEX ON billing.voicemails (i_account);
CREATE INDEX ON billing.invoices (i_customer);

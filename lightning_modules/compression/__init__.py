"""Progressive block drop as an opt-in capability of a task: the protocol a task implements (``task``), the
scoring of candidate drops (``scoring``), the ``compress`` command (``command``), its settings (``settings``) and
its report (``report``)."""

"""Inbound checks: one small interface, one module per check, an ordered chain.

A check implements any of the stage methods of `base` (`at_connect`, `at_mail`, `at_rcpt`,
`at_end_of_data`), each returning a `Verdict`: go on, refuse with a reply, or (at end of
data) add header lines. `CheckChain` runs the checks of a stage in list order; the first
refusal wins. Which checks run, and in which order, is the list `chain.checks_for_role`
builds: adding a check is one module and one line there.
"""

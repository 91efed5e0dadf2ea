"""Matching: candidate places in an analysed model (residual branches, conv units, whole blocks),
the rules that pick among them, and the plan (Site, Plan) with the new blocks' names."""

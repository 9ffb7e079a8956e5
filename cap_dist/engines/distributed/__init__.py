"""The distributed engine on Ray: plan.py (blocks -> actors), actor.py (PruneActor), driver.py (the run)."""

"""The attacker: countermeasures on the photos, personalization, sampling."""

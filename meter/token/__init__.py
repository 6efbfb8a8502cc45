"""meter.token"""

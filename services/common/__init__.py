"""What every service needs: settings, logging, metrics and clients for the stores."""
